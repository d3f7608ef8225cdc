"""Auditing a labelled folder before training on it: exact and near-duplicates (and whether they leak across the
split or disagree on their label), label issues from out-of-fold probabilities, and odd files. ``sedense audit``
(``command``) writes the report; ``duplicates`` finds the copies; ``report`` writes the CSVs and the page."""

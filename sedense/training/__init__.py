"""How a network is trained, in plain PyTorch, one module a job: ``optimizers`` (groups and the fastest
implementation), ``schedule`` (warm-up and cosine), ``time_plan`` (the epochs a time budget holds), ``ema`` (the
weights' moving average) and ``resizing`` (progressive image sizes, compiled once each). The Lightning pieces that
use them are the LightningModule and the ``TimeBudget`` callback."""

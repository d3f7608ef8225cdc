from sedense.cli import main

main()

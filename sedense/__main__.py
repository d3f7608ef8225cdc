from sedense.commands import main

main()

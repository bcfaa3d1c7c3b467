from loadagg.cli.commands import main

main()

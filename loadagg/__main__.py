from loadagg.cli import main

main()

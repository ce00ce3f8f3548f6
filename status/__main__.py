from status.cli import main

main()

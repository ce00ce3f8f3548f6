from source_connector.cli import main

main()

from sink_connector.cli import main

main()

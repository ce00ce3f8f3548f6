from pg_kafka_cdc.status.cli import main

main()

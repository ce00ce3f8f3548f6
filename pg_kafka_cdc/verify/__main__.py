from pg_kafka_cdc.verify.cli import main

main()

"""Exit 0 when a Kafka broker answers a metadata request at the given address (stack readiness)."""

import sys

from confluent_kafka.admin import AdminClient

if __name__ == "__main__":
    admin = AdminClient({"bootstrap.servers": sys.argv[1], "socket.timeout.ms": 2000})
    brokers = admin.list_topics(timeout=3).brokers
    sys.exit(0 if brokers else 1)

"""keytrace's collector: traced Kafka clients, trace sinks and the DuckDB trace store."""

from collector.consumer import TracedConsumer
from collector.producer import TracedProducer

__all__ = ["TracedConsumer", "TracedProducer"]
__version__ = "0.1.0"

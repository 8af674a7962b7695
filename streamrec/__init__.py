"""streamrec: a real-time sequential recommender that lives on Kafka."""

__version__ = "0.1.0"

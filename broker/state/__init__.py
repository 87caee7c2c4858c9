"""Pure broker state.  Nothing under broker/state/ does I/O or reads a clock."""

from broker.state.core import BrokerState
from broker.state.inspection import BrokerStatistics, QueueStatistics
from broker.state.queue import Message, Queue, QueueOptions

__all__ = ["BrokerState", "BrokerStatistics", "QueueStatistics", "Message", "Queue", "QueueOptions"]

"""The broker seam both sides use: ``Bus`` and its two implementations.

``MqttBus`` (paho-mqtt; MQTT 5 with a 3.1.1 fallback) is the real one; ``MemoryBus`` on a
``MemoryBroker`` is for unit tests of one stage.
"""

from .base import BrokerConfig, Bus, BusError, Handler, Message, topic_matches
from .memory import MemoryBroker, MemoryBus
from .mqtt import MqttBus

__all__ = ["BrokerConfig", "Bus", "BusError", "Handler", "Message", "MemoryBroker", "MemoryBus",
           "MqttBus", "topic_matches"]

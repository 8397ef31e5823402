"""Reading scans, data sources, protocols, episodes and caching."""

from medmeta.data.episodes import Episode, EpisodeSampler
from medmeta.data.protocol import Protocol, load_protocol
from medmeta.data.reading import Preprocessing, ScanReader, scan_format
from medmeta.data.records import ImageRecord
from medmeta.data.store import ImageStore

__all__ = [
    "Episode",
    "EpisodeSampler",
    "ImageRecord",
    "ImageStore",
    "Preprocessing",
    "Protocol",
    "ScanReader",
    "load_protocol",
    "scan_format",
]

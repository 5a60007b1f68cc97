"""The `raylm` logger prints to stderr by default (like vLLM), so the KV-cache sizing and
model loading lines show up without any logging setup; $RAYLM_LOG_LEVEL sets the level."""
from __future__ import annotations

import logging

_FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"


def init_logger(level: str) -> logging.Logger:
    logger = logging.getLogger("raylm")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    return logger

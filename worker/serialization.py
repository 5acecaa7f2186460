"""The serializer of every RQ job, result and job meta this service puts in Redis: JSON, never
pickle.

RQ pickles by default, so whoever can write to Redis would run code in every worker and in the
backend. With :class:`JobSerializer` a job's arguments, its meta and its result are JSON
(``orjson``): dicts with string keys, lists, strings, numbers, booleans and None. Numpy arrays
and scalars are written as JSON lists and numbers (brush RLE comes as a uint8 array) and read
back as lists. Bytes that are not JSON, such as a pickle placed in Redis by someone else, fail
the job with RQ's ``DeserializationError`` and are never executed.

Every Queue, Job, Worker, registry and scheduler of this service passes
``serializer=JobSerializer``; RQ's command line needs ``--serializer
worker.serialization.JobSerializer``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def _default(value: Any) -> Any:
    if isinstance(value, np.ndarray):  # not C-contiguous: orjson's numpy option skips it
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON: job arguments and results must be")


class JobSerializer:
    """RQ serializer (``dumps``/``loads``) on orjson; see module docstring."""

    @staticmethod
    def dumps(value: Any) -> bytes:
        return orjson.dumps(value, default=_default, option=_OPTIONS)

    @staticmethod
    def loads(data: bytes) -> Any:
        return orjson.loads(data)

"""Metric sinks: TensorBoard event files (no TensorFlow needed) and a JSON-lines log.

Only process 0 writes; other processes get a writer whose methods do nothing.
"""
from __future__ import annotations

import io
import json
import time
from typing import Mapping

import numpy as np
from etils import epath
from PIL import Image


class MetricWriter:
    """Scalars and images to WORKDIR/tensorboard + scalars to WORKDIR/metrics.jsonl."""

    def __init__(self, logdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return

        path = epath.Path(logdir)
        path.mkdir(parents=True, exist_ok=True)
        self._jsonl = (path / "metrics.jsonl").open("a")
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._tb = EventFileWriter(str(path / "tensorboard"))
        except ImportError:  # tensorboard is optional at run time; JSON lines always work
            self._tb = None

    def _event(self, step: int, values) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=values)
        self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            from tensorboard.compat.proto import summary_pb2

            self._event(step, [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in clean.items()])

    def record(self, step: int, **fields) -> None:
        """One JSON line of non-scalar facts about the run (e.g. the kernels and backend it runs)."""
        if self.enabled:
            self._jsonl.write(json.dumps({"step": int(step), **fields}, sort_keys=True) + "\n")
            self._jsonl.flush()

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """image: uint8 [H, W, 3]."""
        if not self.enabled or self._tb is None:
            return
        from tensorboard.compat.proto import summary_pb2

        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        img = summary_pb2.Summary.Image(
            height=image.shape[0], width=image.shape[1], colorspace=3, encoded_image_string=buf.getvalue()
        )
        self._event(step, [summary_pb2.Summary.Value(tag=tag, image=img)])

    def flush(self) -> None:
        if self.enabled and self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.close()
        self._jsonl.close()

"""TensorBoard event files without TensorFlow: scalars as TFRecords of tensorboard's protos.

Importing TensorFlow (clu's and tf.summary's writers do, and so does tensorboard's own
EventFileWriter when TensorFlow is installed) costs ~4 s of CPU in every process that trains or
evaluates. The file format is small: records of Event protos (tensorboard's pure-Python copies
of TensorFlow's), each framed by its length and masked CRC-32C. Files are opened through
etils.epath, so a gs:// workdir works where epath's backend does.
"""
import itertools
import os
import socket
import time

from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer.record_writer import RecordWriter


_SCALAR = scalar_metadata.create_summary_metadata(display_name="", description="")
_WRITERS = itertools.count()   # a second writer of this process in the same second gets its own file


class ScalarWriter:
  """write_scalars(step, {tag: value}) into <logdir>/events.out.tfevents.*, as tf.summary.scalar
  writes them (a float32 scalar tensor, the scalars plugin's metadata); flushed at every call
  (a crash loses nothing written)."""

  def __init__(self, logdir: str):
    path = epath.Path(logdir)
    path.mkdir(parents=True, exist_ok=True)
    name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}."
            f"{next(_WRITERS)}")
    self._records = RecordWriter((path / name).open("wb"))
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def write_scalars(self, step: int, scalars: dict) -> None:
    values = [summary_pb2.Summary.Value(
        tag=tag, metadata=_SCALAR,
        tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[float(v)]))
        for tag, v in scalars.items()]
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                summary=summary_pb2.Summary(value=values)))

  def _write(self, event: event_pb2.Event) -> None:
    self._records.write(event.SerializeToString())
    self._records.flush()

  def close(self) -> None:
    self._records.close()

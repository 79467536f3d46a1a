"""A readable console for the command-line entries: TensorFlow's chatter off, real problems on.

Imported by every entry module before anything imports TensorFlow (`official_maskrcnn.train`,
`evaluate`, `predict`, `export`, the backbone converters, `tfrecord_tools.verify_tfrecord` and
`create_coco_tfrecord`). It changes something only when the process was started as one of
them (`python -m official_maskrcnn.train ...`: the `__main__` module belongs to this
project); a program or a test that imports an entry module to call its functions keeps
TensorFlow's logging exactly as it configured it. Run as a command, by default:

- C++ logging (`TF_CPP_MIN_LOG_LEVEL`, default 2: errors only). TensorFlow reads the variable
  once, when it loads, hence the import order. The variable only reaches TensorFlow's own
  logger; the parts of TensorFlow 2.20 that log through absl (grappler's "Error in
  PredictCost() for the op: CropAndResize", tf.data's "Could not find a final `prefetch` ...
  slack", the loop optimizer, all printed as `W0000 ...` warnings) ignore it, so the same level
  is given to absl's logger too (`absl::SetMinLogLevel`, found in libtensorflow_framework).
- On a machine without the NVIDIA driver (no `libcuda.so.1`, so no GPU can be used anyway),
  TensorFlow's probe of the CUDA driver logs "failed call to cuInit" as an *error*; that one
  line, printed while TensorFlow loads and lists its devices, is dropped. Everything else
  printed meanwhile is passed on in order. With a driver present the line is a real problem
  (a GPU machine that will train on its CPU) and is kept.
- TensorFlow's and Keras's Python INFO lines off, unless `--verbosity` / `-v` is given (absl
  entries): TensorFlow's own logger at WARNING, and what their code writes at INFO through
  absl's logger ("Sharding callback duration" at every checkpoint) dropped. They are about
  TensorFlow's internals, not the run; the entries' own INFO lines stay.

A user's `TF_CPP_MIN_LOG_LEVEL` is respected: it is applied to both C++ loggers and nothing
is dropped (0 shows every line TensorFlow prints, cuInit included).
"""

import contextlib
import ctypes
import logging
import mmap
import os
import re
import sys
import tempfile

LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
DEFAULT_LEVEL = "2"  # 0 everything, 1 warnings and errors, 2 errors, 3 fatal errors only
PACKAGES = ("official_maskrcnn", "tfrecord_tools")

# The line TensorFlow logs, as an error, when it probes for a GPU and no driver is installed.
NO_DRIVER_CUINIT = re.compile(r"\] failed call to cuInit\b")

# absl::SetMinLogLevel(absl::LogSeverityAtLeast): mangled with absl's release namespace
# (lts_20250127 in TensorFlow 2.20), which changes with TensorFlow, hence the search.
_SET_MIN_LOG_LEVEL = re.compile(rb"_ZN4absl\d+lts_\d+14SetMinLogLevelENS0_18LogSeverityAtLeastE")
_FRAMEWORK_LIBRARY = "libtensorflow_framework.so.2"


def started_as_entry():
    """Whether this process was started as a module of this project (`python -m PKG.MODULE`)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name.split(".")[0] in PACKAGES


def cuda_driver_present():
    """Whether the NVIDIA driver's library can be loaded (without it no GPU can be used)."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def lines_dropped(pattern):
    """Holds back what is written to file descriptor 2 (C++ and Python alike) while active,
    then writes it to the real stderr in order, without the lines matching `pattern`.

    The capture goes to a temporary file, not a pipe, so that nothing can block; should the
    block raise, what was captured is still passed on (before the traceback).
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(keepends=True)
                    if not pattern.search(line.decode("utf-8", "replace"))]
            os.write(2, b"".join(kept))


def set_absl_min_log_level(level):
    """Gives absl's C++ logger (the one TensorFlow shares) the minimum severity `level`
    (0 info, 1 warning, 2 error, 3 fatal, as TF_CPP_MIN_LOG_LEVEL); returns whether it could.

    Call after TensorFlow is imported (the library is then loaded, and found by its path).
    """
    import tensorflow as tf  # already imported: only the module object is wanted

    path = os.path.join(tf.sysconfig.get_lib(), _FRAMEWORK_LIBRARY)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            match = _SET_MIN_LOG_LEVEL.search(data)
            name = match.group(0).decode() if match else None  # before the map closes
        if not name:
            return False
        setter = getattr(ctypes.CDLL(path), name)
    except (OSError, ValueError, AttributeError):
        return False  # another platform or build: TensorFlow keeps absl's default
    setter.argtypes, setter.restype = [ctypes.c_int], None
    setter(level)
    return True


class DropInfoFrom(logging.Filter):
    """Drops the records below WARNING logged by code under one of `directories`."""

    def __init__(self, directories):
        super().__init__()
        self.directories = tuple(os.path.join(d, "") for d in directories)

    def filter(self, record):
        return record.levelno >= logging.WARNING or not record.pathname.startswith(
            self.directories)


def quiet_python_logging_unless_verbosity_given(libraries=("tensorflow", "tf_keras")):
    """Once absl has parsed the flags, unless the command line set `--verbosity`: TensorFlow's
    Python logger at WARNING, and the INFO lines that TensorFlow's and Keras's code writes
    through absl's logger (the one the entries use too) dropped."""
    from absl import app, flags
    from absl import logging as absl_logging

    def after_flags():
        if flags.FLAGS["verbosity"].present:
            return
        logging.getLogger("tensorflow").setLevel(logging.WARNING)
        directories = [os.path.dirname(sys.modules[name].__file__) for name in libraries
                       if getattr(sys.modules.get(name), "__file__", None)]
        absl_logging.get_absl_logger().addFilter(DropInfoFrom(directories))

    app.call_after_init(after_flags)


def configure():
    """Applies the module docstring's defaults and imports TensorFlow (see there)."""
    user_level = os.environ.get(LEVEL_VARIABLE)
    os.environ.setdefault(LEVEL_VARIABLE, DEFAULT_LEVEL)
    drop = user_level is None and not cuda_driver_present()
    with lines_dropped(NO_DRIVER_CUINIT) if drop else contextlib.nullcontext():
        import tensorflow as tf
        tf.config.list_physical_devices()  # the CUDA probe: its cuInit line, if any, is here
    try:
        set_absl_min_log_level(int(os.environ[LEVEL_VARIABLE]))
    except ValueError:
        pass  # not a number: TensorFlow reads it as 0 (everything), so absl stays as it is
    quiet_python_logging_unless_verbosity_given()


if started_as_entry():
    configure()

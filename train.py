"""Train GPT-2.

    python train.py --config configs/small.py [--config.train.num_steps=200] [--workdir DIR]
    python train.py --config configs/gpt2_124m.py --preflight [--preflight_devices 64]   # no training

Multi-host: on a Cloud TPU VM every worker runs the same command (jax.distributed finds its
peers); elsewhere add --coordinator_address HOST:PORT --num_processes N --process_id I.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "A config file in configs/.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go (default: workdir/<config name>).")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for a multi-process run.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_bool("tpu_pod", False, "Call jax.distributed.initialize() with no arguments (Cloud TPU pod slice).")
flags.DEFINE_bool("preflight", False, "Print the mesh, per-device memory, FLOPs per step and warnings; do not train.")
flags.DEFINE_integer("preflight_devices", None, "With --preflight: plan for this many devices (more than "
                     "exist here: sizes from abstract shapes, no compilation).")
flags.DEFINE_float("preflight_device_memory_gb", None, "With --preflight: the device memory in GiB to check "
                   "against (for devices that do not report it, e.g. CPU).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and jax log a lot at INFO
    import os

    import jax

    from gpt2_jax import compilation_cache

    # Beside the corpus cache: a second run of the same config loads its programs instead of compiling.
    compilation_cache.enable(default=os.path.join(FLAGS.config.data.cache_dir, "jax_cache"))
    if FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.tpu_pod:
        from gpt2_jax.training.distributed import initialize

        initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if FLAGS.preflight:
        from gpt2_jax.training.preflight import format_report, report

        try:
            figures = report(FLAGS.config, FLAGS.preflight_devices, device_memory_gb=FLAGS.preflight_device_memory_gb)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        if jax.process_index() == 0:
            print(format_report(figures))
        return
    from gpt2_jax.training.trainer import NonFiniteLossError, train

    workdir = FLAGS.workdir
    if workdir is None:
        name = os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS["config"])))[0]
        workdir = os.path.join("workdir", name)
    try:
        summary = train(FLAGS.config, workdir)
    except (ValueError, NonFiniteLossError) as e:  # bad config or data, or a NaN: one clear line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if jax.process_index() == 0:
        print(f"done: step {summary['step']}, loss {summary['loss']:.4f}, workdir {summary['workdir']}")


if __name__ == "__main__":
    try:
        app.run(main)
    except (KeyError, AttributeError) as e:  # raised while ml_collections applies --config.X overrides
        import traceback

        if not any("ml_collections" in frame.filename for frame in traceback.extract_tb(e.__traceback__)):
            raise
        import re

        text = str(e).replace("\\'", "'").replace("\\n", "\n")
        key = re.search(r"'([^'\s]+)'", text)
        hint = re.search(r'Did you mean "([^"]+)"', text)
        print(f"error: unknown config key {key.group(1) if key else text!r} in a --config.* override"
              + (f' (did you mean "{hint.group(1)}"?)' if hint else "")
              + "; every key is listed in configs/base.py", file=sys.stderr)
        sys.exit(2)

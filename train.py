"""Train GPT-2.

    python train.py --config configs/small.py [--config.train.num_steps=200] [--workdir DIR]
    python train.py --config configs/gpt2_124m.py --preflight [--preflight_devices 64]   # no training
    python train.py --config configs/gpt2_124m.py --preflight --topology v5e-8 [--slices 2] [--json]

Multi-host: on a Cloud TPU VM every worker runs the same command (jax.distributed finds its
peers); elsewhere add --coordinator_address HOST:PORT --num_processes N --process_id I.
Exit codes (gpt2_jax/cli.py): 0 done, 2 a usage or input error (one `error:` line), 1 a bug.
"""

import json
import os
import re
import traceback

from absl import flags, logging
from ml_collections import config_flags

from gpt2_jax import cli, storage

config_flags.DEFINE_config_file("config", None, "A config file in configs/.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go (default: workdir/<config name>); "
                    "a local folder or gs://bucket/path.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for a multi-process run.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_bool("tpu_pod", False, "Call jax.distributed.initialize() with no arguments (Cloud TPU pod slice).")
flags.DEFINE_integer("heartbeat_timeout_s", None, "Multi-process: a process silent this many seconds is declared "
                     "dead, and the others exit (non-zero) instead of waiting for it (default: "
                     "gpt2_jax/training/distributed.py's HEARTBEAT_TIMEOUT_S, 30).")
flags.DEFINE_bool("preflight", False, "Print the mesh, per-device memory, FLOPs per step and warnings; do not train.")
flags.DEFINE_integer("preflight_devices", None, "With --preflight: plan for this many devices (more than "
                     "exist here: sizes from abstract shapes, no compilation).")
flags.DEFINE_float("preflight_device_memory_gb", None, "With --preflight: the device memory in GiB to check "
                   "against (for devices that do not report it, e.g. CPU).")
flags.DEFINE_string("topology", None, "With --preflight: compile for this Cloud TPU slice on this host (no TPU "
                    "needed; libtpu from `pip install -e \".[tpu]\"`), e.g. v5e-8, v5p-8, v4-8, v6e-8.")
flags.DEFINE_integer("slices", None, "With --topology: this many such slices (sets config.mesh.slices: the data "
                     "axis spans them).")
flags.DEFINE_bool("fit_search", False, "With --topology: find the largest micro-batch that fits by compiling "
                  "(a few more compiles) instead of a linear estimate from two.")
flags.DEFINE_bool("json", False, "With --preflight: print the report as one JSON object.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def load_config():
    """FLAGS.config, or one `error:` line if its file does not exist (ml_collections loads it lazily).

    `--config FILE:ARG` passes ARG to the file's get_config (configs/speedrun_cpu.py:modern)."""
    path = config_flags.get_config_filename(FLAGS["config"])
    if not os.path.isfile(path) and ":" in path:
        path = path.rsplit(":", 1)[0]
    if not os.path.isfile(path):
        cli.fail(f"--config {path}: no such file")
    return FLAGS.config


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and jax log a lot at INFO
    config = load_config()
    _check_topology_flags()
    storage.check(FLAGS.workdir, "--workdir")  # gs:// paths need gcsfs: said before jax loads
    storage.check(config.model.init_from, "config.model.init_from")
    if not FLAGS.preflight:  # a missing corpus fails here, in a fraction of a second, before jax loads
        from gpt2_jax.data.corpus import check_source

        for source in filter(None, (config.data.source, config.data.val_source)):
            check_source(source)
    import jax

    from gpt2_jax import compilation_cache

    # Beside the corpus cache: a second run of the same config loads its programs instead of compiling.
    if FLAGS.topology is None:  # a program compiled here for another machine: nothing to cache
        compilation_cache.enable(default=os.path.join(config.data.cache_dir, "jax_cache"))
    if FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.tpu_pod:
        from gpt2_jax.training.distributed import initialize

        timeouts = {} if FLAGS.heartbeat_timeout_s is None else {"heartbeat_timeout_s": FLAGS.heartbeat_timeout_s}
        initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, **timeouts)
    if FLAGS.preflight:
        from gpt2_jax.training.preflight import format_report, report

        figures = report(config, FLAGS.preflight_devices, device_memory_gb=FLAGS.preflight_device_memory_gb,
                         topology=FLAGS.topology, slices=FLAGS.slices, fit_search=FLAGS.fit_search)
        if jax.process_index() == 0:
            print(json.dumps(figures) if FLAGS.json else format_report(figures))
        return
    from gpt2_jax.training.trainer import NonFiniteLossError, done_line, train

    workdir = FLAGS.workdir
    if workdir is None:
        name = os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS["config"])))[0]
        workdir = os.path.join("workdir", name)
    try:
        summary = train(config, workdir)
    except NonFiniteLossError as e:  # the data or the config made the loss diverge
        cli.fail(str(e))
    if "sample_from" in summary:  # the end-of-run sample, from the final parameters
        from gpt2_jax.inference.sampling import complete

        model_config, params, prompt = summary.pop("sample_from")
        text = complete(model_config, params, prompt, max_new_tokens=config.train.sample_tokens,
                        seed=config.train.seed)
        print("---- sample ----\n" + text + "\n----------------", flush=True)
    if jax.process_index() == 0:
        print(done_line(summary))


def _check_topology_flags() -> None:
    """Checks the --topology flags; with --topology, prepares this process to compile for it (before
    jax loads: the CPU backend, libtpu without a chip)."""
    if FLAGS.topology is None:
        for name in ("slices", "fit_search"):
            if FLAGS[name].present:
                cli.fail(f"--{name} needs --preflight --topology NAME")
        return
    from gpt2_jax import topology

    if not FLAGS.preflight:
        cli.fail("--topology compiles for a TPU slice without training: add --preflight")
    if FLAGS.preflight_devices is not None:
        cli.fail("--topology and --preflight_devices both set the device count: give one")
    if FLAGS.slices is not None and FLAGS.slices < 1:
        cli.fail(f"--slices={FLAGS.slices} must be a positive number of TPU slices")
    try:
        topology.prepare(FLAGS.topology)
    except ValueError as e:
        cli.fail(str(e))


def unknown_key_message(error: Exception) -> str | None:
    """The `error:` line for an unknown key in a --config.X=... override, or None for any other error."""
    if not any("ml_collections" in frame.filename for frame in traceback.extract_tb(error.__traceback__)):
        return None
    text = str(error).replace("\\'", "'").replace("\\n", "\n")
    key = re.search(r"'([^'\s]+)'", text)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    return (f"unknown config key {key.group(1) if key else text!r} in a --config.* override"
            + (f' (did you mean "{hint.group(1)}"?)' if hint else "") + "; every key is listed in configs/base.py")


if __name__ == "__main__":
    try:
        cli.run(main)
    except (KeyError, AttributeError) as e:  # raised while ml_collections applies --config.X overrides
        message = unknown_key_message(e)
        if message is None:
            raise
        cli.fail(message)

"""The search: Optuna studies over reduction plans, persisted in SQL, driven from the command line."""

__version__ = "0.1.0"


def exit_without_final_collection() -> None:
    """Let this process end without the interpreter's last garbage collection.

    At exit Python collects every reference cycle among the objects of the modules it loaded; with torch,
    timm and Optuna loaded that is some 600,000 objects and 2-3 s of one core, half a minute and more on a
    loaded host, where it held up a Ctrl-C long after the trial was marked and the study printed. The
    process is ending: its memory is returned, its databases are committed and its output is flushed
    anyway. ``gc.freeze`` at exit puts the objects out of the collector's reach; exit handlers and
    reference-count finalizers still run. Registering again replaces the earlier registration.
    """
    import atexit
    import gc

    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)

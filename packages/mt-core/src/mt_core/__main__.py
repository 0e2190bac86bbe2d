"""``python -m mt_core run RUN.toml``: one rank of a run, the program that
:func:`mt_core.launch.run_training` starts under torchrun.

Why it exists: torchrun needs a program to start on every rank, and mt-core may not use the ``mt``
command for it (the app sits above mt-core; DESIGN.md's dependency rule). So this is ``mt run``
without overrides or help, for launchers rather than people. Its exit statuses are ``mt run``'s:
errors a user can cause end as ``mt: error: ...`` lines and exit status 2, a run that started and
stopped for a stated reason (a NaN loss, a full disk) with exit status 1; anything else keeps its
traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = "usage: python -m mt_core run RUN.toml   (the `mt` command is the one for people)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] != "run":
        print(USAGE, file=sys.stderr)
        return 2
    from mt_core.config import ConfigError, load_run_file, place_problems
    from mt_core.errors import PeerLostError, RunError, report_error
    from mt_data import DataError

    try:
        args = load_run_file(argv[1])
        from mt_core.trainer.loop import train  # torch and the model stack: only for a good config

        try:
            train(args)
        except ConfigError as error:  # found with the model or data: placed in the run file
            raise place_problems(error, argv[1]) from None
    except (ConfigError, DataError) as error:
        report_error(str(error))  # under torchrun: once for all ranks
        return 2
    except PeerLostError:  # other ranks ended: one rank has said so for the whole run
        from mt_fsdp import exit_rank

        exit_rank(1)  # at once: the teardown of a broken process group can take seconds
        return 1
    except RunError as error:  # the run started and stopped for a stated reason: as `mt run`
        report_error(str(error))
        return 1
    from mt_fsdp import exit_rank

    exit_rank(0)  # a finished gloo rank leaves before teardown can abort it
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m task_manager serve ...`: the same as the `task-manager` command."""

import sys

from task_manager.cli import main

sys.exit(main())

"""``python -m billing.transform <dbt args>``: dbt in a child process (see ``project.main``)."""

import sys

from billing.transform.project import main

sys.exit(main())

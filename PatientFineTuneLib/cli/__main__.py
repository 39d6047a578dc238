"""``python -m PatientFineTuneLib.cli``: the ``patient-finetune`` command."""

import sys

from . import main

sys.exit(main())

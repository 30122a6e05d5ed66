"""`python -m pipelines.embedded`: build or check the embedded default data."""

import sys

from pipelines.embedded import main

sys.exit(main())

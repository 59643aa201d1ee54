"""``python -m dist_rnn`` runs the command line."""

import sys

from dist_rnn.cli import main

sys.exit(main())

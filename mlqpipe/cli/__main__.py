import sys

from mlqpipe.cli.commandline import main

sys.exit(main())

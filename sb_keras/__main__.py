import sys

from sb_keras.cli import main

sys.exit(main())

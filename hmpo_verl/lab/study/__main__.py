import sys

from hmpo_verl.lab.study.cli import main

sys.exit(main())

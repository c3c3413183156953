# medEDM test helper: run an entry point (train.py, generate.py) with the toy
# stage classes of stage_toys.py admitted by the restricted unpickler (they are
# not in a project package). Usage: stage_entry.py <script> [hydra args].

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stage_toys # pylint: disable=unused-import,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
script = os.path.join(ROOT, sys.argv.pop(1))
sys.argv[0] = script
runpy.run_path(script, run_name='__main__')

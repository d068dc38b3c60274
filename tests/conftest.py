"""Keep the suite independent of the machine's `llamac tune` results: compiles see no user tuning file."""
import os
import tempfile

os.environ["LLAMAC_TUNING_DIR"] = tempfile.mkdtemp(prefix="llamac-test-tuning-")

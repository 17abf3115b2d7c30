"""How a process of the service imports TensorFlow and Keras: once, outside the collector's scans."""

import json
import subprocess
import sys

PROBE = """
import gc, json, sys
from seeds_tf.core import startup
before = "keras" in sys.modules
startup.import_tensorflow()
frozen = gc.get_freeze_count()
garbage = [[index] for index in range(1000)]
startup.import_tensorflow()
print(json.dumps({
    "before": before,
    "imported": "keras" in sys.modules and "tensorflow" in sys.modules,
    "collector_on": gc.isenabled(),
    "frozen": frozen,
    "frozen_again": gc.get_freeze_count(),
}))
"""


def test_tensorflow_is_imported_once_and_frozen_with_the_collector_left_on():
    """In a fresh process: the import freezes what it made (hundreds of thousands of objects), a
    second call freezes nothing more (later garbage stays collectable), and the collector is on."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    probe = json.loads(done.stdout.splitlines()[-1])
    assert probe["before"] is False
    assert probe["imported"] is True
    assert probe["collector_on"] is True
    assert probe["frozen"] > 100_000
    assert probe["frozen_again"] == probe["frozen"]

"""Shinkansen's WebUI entry: registration only (the code is in the ``trainer`` package beside it).

The package is imported under the name ``shinkansen_trainer``, not ``trainer``: TrainTrain's
package is also called ``trainer`` and may already sit in ``sys.modules``; a plain
``import trainer`` would then run its code instead of ours. The WebUI re-executes this file
on "Reload UI"; the package is loaded once, so a running job survives the reload.
"""
import importlib
import importlib.util
import os
import sys

from modules import script_callbacks

PACKAGE = "shinkansen_trainer"
EXTENSION_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_package():
    folder = os.path.join(EXTENSION_DIR, "trainer")
    loaded = sys.modules.get(PACKAGE)
    if loaded is not None and os.path.dirname(os.path.abspath(loaded.__file__)) == folder:
        return loaded
    spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package      # before executing: relative imports inside resolve to it
    try:
        spec.loader.exec_module(package)
    except BaseException:
        sys.modules.pop(PACKAGE, None)
        raise
    return package


_load_package()
webui = importlib.import_module(PACKAGE + ".webui.adapter")

script_callbacks.on_before_ui(webui.before_ui)
script_callbacks.on_ui_tabs(webui.ui_tabs)
script_callbacks.on_ui_settings(webui.ui_settings)
script_callbacks.on_app_started(webui.app_started)
script_callbacks.on_script_unloaded(webui.script_unloaded)

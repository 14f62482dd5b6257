"""The notebook face of taskapp_notebook: ``%taskapp`` magics, kernel hooks, the widget.

Load it with ``%load_ext taskapp_notebook``; see :mod:`.magics` for the commands.
"""

from __future__ import annotations

"""ComfyUI nodes of Ref-Diff. Each module holds the nodes of one stage; the repository root's ``__init__.py``
imports them one by one, so a missing optional package disables only the nodes that need it.

``payloads`` and ``helpers`` import no ComfyUI module: they hold the data passed between nodes and the
conversions the nodes share, and are tested without ComfyUI.
"""

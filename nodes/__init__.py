"""ComfyUI nodes of Ref-Diff. The ``*_nodes`` modules (and ``segment_node``) hold the nodes of one stage each;
the repository root's ``__init__.py`` imports them one by one, so a missing optional package disables only the
nodes that need it. The other modules hold what those nodes share (docs/ARCHITECTURE.md, "nodes/").

``wire_types``, ``text_inputs``, ``token_positions``, ``tensors``, ``attention_maps``, ``feature_clusters``,
``spatial_scores``, ``segs_convert`` and ``previews`` import no ComfyUI module and are tested without ComfyUI;
``sockets``, ``runtime``, ``model_files`` and ``comfy_backend`` are the ComfyUI side.
"""

"""The built-in prompt plugins of imagegen, registered under the entry-point group
``imagegen.plugins``: ``time_of_day``, ``holiday``, ``art_style``, ``lora``, ``remote_context``.
"""

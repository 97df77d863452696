"""Image data: sources, the shard writer (``lina data build``), the checked shard reader, the resumable
training stream, the DataModule and ``lina data verify``.

Nothing is imported here so that ``lina data build --help`` stays fast; import the modules by path.
"""

"""Class-to-image data: image sources, the shard writer (``lina data build``) and the webdataset DataModule.

Nothing is imported here so that ``lina data build --help`` stays fast; import the modules by path.
"""

from ptfast import _C  # noqa: F401

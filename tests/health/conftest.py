from tests.extproc.conftest import endpoints_file, epp, make_epp  # noqa: F401  (the in-process EPP fixtures)

import os

if os.environ.get("DORM_INTERPRETED") == "1":  # see gateway/compiled.py
    from gateway.compiled import install_source_first

    install_source_first()

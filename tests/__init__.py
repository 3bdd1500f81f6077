"""k2ray's tests (a package, so helpers are imported relatively and nothing is put on sys.path)."""

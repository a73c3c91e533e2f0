"""Where workers come from: the config file, a service registry, etcd and the admin API's
overrides, merged into one list; drains that end when a worker's last request does.
"""

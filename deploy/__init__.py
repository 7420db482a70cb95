"""The systemd units in this folder, installed as package data so install-service can write them."""

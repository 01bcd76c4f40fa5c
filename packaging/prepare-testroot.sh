#!/usr/bin/env bash
# Placeholder until the packaging work lands: prepares the cached Debian root for the .deb test.
exit 0

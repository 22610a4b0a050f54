#!/bin/sh
# local_rsh.sh HOST CMD... — an "ssh" that runs CMD on this machine and ignores HOST.
# For trying ps-launch and ps-preflight without other hosts (and for the tests that run
# without root): give every host addr=127.0.0.1 in the hostfile.
#   ps-launch --hostfile hosts --rsh "sh scripts/cluster/local_rsh.sh"
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done   # drop ssh-style options
shift                                                        # the host
exec /bin/sh -c "$*"

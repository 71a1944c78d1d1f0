# The fleet demo and its runbook (docs/fleet.md): supervise instances on simulated VMs, each
# registered with its own VM's Consul agent, behind HAProxy that finds them through Consul DNS,
# in two WAN-joined datacenters (prod and dev). Included by the Makefile.
#
#   make fleet-demo     build the images, start the fleet, print its URLs and commands
#   make fleet-down     remove its containers, network, volumes and work dir
#   make test-fleet     the end-to-end fleet tests (tests/fleet, marker `fleet`): 3-4 min warm, 6 cold
#
# FLEET_PORT=0: loopback ports chosen by Docker (printed), as the tests do.
FLEET_PORT ?= 8090
FLEET_DCS  ?= prod,dev
FLEET_VMS  ?= 3

.PHONY: fleet-demo fleet-down fleet-status test-fleet

# install: scripts/image.sh builds the image's wheelhouse with the venv's pip.
fleet-demo: install
	bash scripts/fleet.sh up --port $(FLEET_PORT) --dcs $(FLEET_DCS) --vms $(FLEET_VMS)

fleet-down: check-prereqs
	bash scripts/fleet.sh down

fleet-status: check-prereqs
	bash scripts/fleet.sh status

test-fleet: install
	$(PY) -m pytest -q -ra -m fleet tests/fleet

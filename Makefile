# gemmad: build, install (DESTDIR/PREFIX aware), Debian package, unit checks.
#
#   make                                  release build of gemmad and gemmactl
#   sudo make install PREFIX=/usr         files only (see "post-install" below)
#   make install DESTDIR=/tmp/stage PREFIX=/usr   staged install for packaging
#   sudo make post-install                create user and dirs, enable gemmad.socket
#   make deb                              target/debian/gemmad_*.deb (needs cargo-deb)
#   make check-units                      systemd-analyze verify + security (CI)
#
# The units name /usr/bin/gemmad and /usr/share/doc/gemmad; the installed copies are
# rewritten to $(BINDIR)/gemmad and $(DOCDIR). docs/systemd.md describes every file.

PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
DATADIR ?= $(PREFIX)/share
DOCDIR ?= $(DATADIR)/doc/gemmad
# /etc whatever PREFIX is: the unit reads /etc/gemmad/gemmad.toml.
SYSCONFDIR ?= /etc
SYSTEMD_SYSTEM_UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSTEMD_USER_UNITDIR ?= $(PREFIX)/lib/systemd/user
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
# dbus-daemon and dbus-broker read bus policies from /usr/share/dbus-1/system.d and
# /etc/dbus-1/system.d only (not /usr/local/share): outside PREFIX=/usr the policy goes
# to /etc.
ifeq ($(PREFIX),/usr)
DBUS_POLICYDIR ?= $(DATADIR)/dbus-1/system.d
else
DBUS_POLICYDIR ?= $(SYSCONFDIR)/dbus-1/system.d
endif
# Activation files are read from /usr/local/share/dbus-1/system-services too.
DBUS_SYSTEM_SERVICEDIR ?= $(DATADIR)/dbus-1/system-services

CARGO ?= cargo
CARGO_TARGET_DIR ?= target
RELEASE_DIR := $(CARGO_TARGET_DIR)/release
INSTALL ?= install

DBUS_POLICY := systemd/org.gemmad.Gemmad1.conf
DBUS_ACTIVATION := systemd/org.gemmad.Gemmad1.service

.PHONY: all build install post-install uninstall deb check-units

all: build

build:
	$(CARGO) build --release --locked -p gemmad -p gemmad-client

# Files only: no users, no systemctl (DESTDIR stays usable for packaging). Does not
# build (`sudo make install` would build as root): run `make` first.
install:
	@for b in gemmad gemmactl; do \
	  [ -x "$(RELEASE_DIR)/$$b" ] || { echo "$(RELEASE_DIR)/$$b missing: run 'make' first" >&2; exit 1; }; \
	done
	@for f in $(DBUS_POLICY) $(DBUS_ACTIVATION); do \
	  [ -f "$$f" ] || { echo "$$f missing" >&2; exit 1; }; \
	done
	$(INSTALL) -d -m 0755 "$(DESTDIR)$(BINDIR)"
	$(INSTALL) -m 0755 "$(RELEASE_DIR)/gemmad" "$(RELEASE_DIR)/gemmactl" "$(DESTDIR)$(BINDIR)/"
	$(INSTALL) -d -m 0755 "$(DESTDIR)$(SYSTEMD_SYSTEM_UNITDIR)" "$(DESTDIR)$(SYSTEMD_USER_UNITDIR)"
	for u in gemmad.service gemmad.socket; do \
	  sed -e 's|/usr/bin/gemmad|$(BINDIR)/gemmad|g' -e 's|/usr/share/doc/gemmad|$(DOCDIR)|g' "systemd/$$u" > "$(DESTDIR)$(SYSTEMD_SYSTEM_UNITDIR)/$$u" && \
	  chmod 0644 "$(DESTDIR)$(SYSTEMD_SYSTEM_UNITDIR)/$$u" && \
	  sed -e 's|/usr/bin/gemmad|$(BINDIR)/gemmad|g' -e 's|/usr/share/doc/gemmad|$(DOCDIR)|g' "systemd/user/$$u" > "$(DESTDIR)$(SYSTEMD_USER_UNITDIR)/$$u" && \
	  chmod 0644 "$(DESTDIR)$(SYSTEMD_USER_UNITDIR)/$$u" || exit 1; \
	done
	$(INSTALL) -D -m 0644 systemd/gemmad.sysusers "$(DESTDIR)$(SYSUSERSDIR)/gemmad.conf"
	$(INSTALL) -D -m 0644 systemd/gemmad.tmpfiles "$(DESTDIR)$(TMPFILESDIR)/gemmad.conf"
	$(INSTALL) -D -m 0644 $(DBUS_POLICY) "$(DESTDIR)$(DBUS_POLICYDIR)/org.gemmad.Gemmad1.conf"
	$(INSTALL) -D -m 0644 $(DBUS_ACTIVATION) "$(DESTDIR)$(DBUS_SYSTEM_SERVICEDIR)/org.gemmad.Gemmad1.service"
	for d in gemmad.service.d gemmad.socket.d; do \
	  $(INSTALL) -d -m 0755 "$(DESTDIR)$(DOCDIR)/dropins/$$d" && \
	  $(INSTALL) -m 0644 systemd/dropins/$$d/*.conf "$(DESTDIR)$(DOCDIR)/dropins/$$d/" || exit 1; \
	done
	$(INSTALL) -m 0644 systemd/gemmad.toml docs/systemd.md README.md "$(DESTDIR)$(DOCDIR)/"
	$(INSTALL) -d -m 0755 "$(DESTDIR)$(SYSCONFDIR)/gemmad"
	@if [ -e "$(DESTDIR)$(SYSCONFDIR)/gemmad/gemmad.toml" ]; then \
	  echo "keeping the existing $(DESTDIR)$(SYSCONFDIR)/gemmad/gemmad.toml (the example is $(DOCDIR)/gemmad.toml)"; \
	else \
	  echo "$(INSTALL) -m 0644 systemd/gemmad.toml $(DESTDIR)$(SYSCONFDIR)/gemmad/gemmad.toml"; \
	  $(INSTALL) -m 0644 systemd/gemmad.toml "$(DESTDIR)$(SYSCONFDIR)/gemmad/gemmad.toml"; \
	fi
	@echo "installed; on the target system run: make post-install (or the commands in docs/systemd.md)"

# What a package's postinst does: the gemmad user, its directories, the socket enabled.
post-install:
	@[ -z "$(DESTDIR)" ] || { echo "post-install acts on the running system; unset DESTDIR" >&2; exit 1; }
	systemd-sysusers gemmad.conf
	systemd-tmpfiles --create gemmad.conf
	systemctl daemon-reload
	systemctl enable --now gemmad.socket

uninstall:
	-[ -n "$(DESTDIR)" ] || systemctl disable --now gemmad.socket gemmad.service
	rm -f "$(DESTDIR)$(BINDIR)/gemmad" "$(DESTDIR)$(BINDIR)/gemmactl"
	rm -f "$(DESTDIR)$(SYSTEMD_SYSTEM_UNITDIR)/gemmad.service" "$(DESTDIR)$(SYSTEMD_SYSTEM_UNITDIR)/gemmad.socket"
	rm -f "$(DESTDIR)$(SYSTEMD_USER_UNITDIR)/gemmad.service" "$(DESTDIR)$(SYSTEMD_USER_UNITDIR)/gemmad.socket"
	rm -f "$(DESTDIR)$(SYSUSERSDIR)/gemmad.conf" "$(DESTDIR)$(TMPFILESDIR)/gemmad.conf"
	rm -f "$(DESTDIR)$(DBUS_POLICYDIR)/org.gemmad.Gemmad1.conf" "$(DESTDIR)$(DBUS_SYSTEM_SERVICEDIR)/org.gemmad.Gemmad1.service"
	rm -rf "$(DESTDIR)$(DOCDIR)"
	@echo "left in place: $(SYSCONFDIR)/gemmad, /var/lib/gemmad (models), /var/cache/gemmad, the gemmad user"

deb: build
	$(CARGO) deb -p gemmad --no-build --strip

check-units:
	tools/check-units.sh

"""Every socket in this network namespace, from /proc/net/{tcp,tcp6,udp,udp6}: the loopback check."""
import ipaddress
import socket


def _address(hex_addr):
    """'0100007F:1F90' -> (IPv4Address('127.0.0.1'), 8080); IPv6 in the kernel's 4 little-endian words."""
    addr, port = hex_addr.split(":")
    raw = bytes.fromhex(addr)
    if len(raw) == 4:
        ip = ipaddress.IPv4Address(raw[::-1])
    else:
        ip = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return ip, int(port, 16)


def parse(text):
    """(local ip, remote ip) of every entry of a /proc/net/* table."""
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3:
            out.append((_address(fields[1])[0], _address(fields[2])[0]))
    return out


def is_local(ip):
    """Loopback, or unspecified (an unbound/unconnected end; 0.0.0.0 binds to lo only here)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


def sockets():
    """(table, local, remote) for every socket of this namespace."""
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/net/{table}") as fh:
                text = fh.read()
        except FileNotFoundError:
            continue
        found += [(table, local, remote) for local, remote in parse(text)]
    return found


def non_loopback():
    """The sockets that are not on loopback (should be none), and the interfaces seen."""
    bad = [s for s in sockets() if not (is_local(s[1]) and is_local(s[2]))]
    return bad, [name for _, name in socket.if_nameindex()]

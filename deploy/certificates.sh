#!/usr/bin/env bash
# Self-signed TLS material for a SuperLink and node-authentication keys for N SuperNodes (docs/deployment.md).
#
#   deploy/certificates.sh OUT_DIR SITES [SUPERLINK_HOST]
#
# OUT_DIR/ca.crt                 root certificate every SuperNode and `flwr` trust (--root-certificates)
# OUT_DIR/server.{pem,key}       the SuperLink's certificate (SAN: localhost, 127.0.0.1, SUPERLINK_HOST) and key
# OUT_DIR/site_XX{,.pub}         each site's EC P-384 key pair: private key stays at the site
#                                (--auth-supernode-private-key), public key goes to `flwr supernode register`
set -euo pipefail
out=${1:?usage: certificates.sh OUT_DIR SITES [SUPERLINK_HOST]}
sites=${2:?usage: certificates.sh OUT_DIR SITES [SUPERLINK_HOST]}
host=${3:-localhost}
mkdir -p "$out"
cd "$out"
openssl req -x509 -newkey rsa:4096 -sha256 -days 365 -nodes -subj "/CN=EchoFlow federation CA" \
  -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:4096 -nodes -subj "/CN=$host" -keyout server.key -out server.csr 2>/dev/null
printf "subjectAltName=DNS:localhost,IP:127.0.0.1,%s\nbasicConstraints=CA:FALSE\n" \
  "$( [[ $host =~ ^[0-9.]+$ ]] && echo "IP:$host" || echo "DNS:$host" )" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha256 \
  -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
for ((i = 0; i < sites; i++)); do
  name=$(printf "site_%02d" "$i")
  rm -f "$name" "$name.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "$name" -f "$name"
done
chmod 600 ./*.key site_*[0-9]
echo "wrote CA, SuperLink certificate and $sites site key pairs to $out"
